"""Identity leakage of generated images against real patients: MeMa Step 3's filter and Tab. 1
(the command line and the full description: ``eval.leakage_filter``)."""
