"""End-to-end generation pipelines (``mema_jax.pipelines.text_to_image.StableDiffusionPipeline``)."""
