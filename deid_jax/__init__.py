"""MedSem-DeID in JAX: the medical-semantics-preserving reversible de-identifier (paper, Fig. 5).

  medical_encoder.py  Enc_med: the first blocks of a diffusion UNet trained on MeMa (or a ViT), frozen
  model.py            image encoder, fusion, password-keyed Transformer ID-Encryptor / ID-Decryptor,
                      image decoder, re-encoder (recovery from the image), discriminator
  passwords.py        512-d password vectors from passphrases (scrypt, salted per dataset)
  losses.py           L_deid, L_rev-id, L_wrong, L_med, L_rev, L_GAN
  train.py            the trainer (launch.main, configs/medsem_deid.py)
  deidentify.py       de-identify / recover folders (Python API and CLI)

Builds on mema_jax; mema_jax never imports deid_jax.
"""
