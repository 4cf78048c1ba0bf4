"""Medical utility of de-identified images (the paper's Tab. 3): disease classification with a fine-tuned DINOv2 or a
ResNet-18 trained from scratch (``eval.medical.classification``) and tumour segmentation with nnU-Net v2
(``eval.medical.segmentation``)."""
