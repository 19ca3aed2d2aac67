"""Real example models for the AdaRound engine: a pretrained sentence-embedding model
(``examples.minilm``) and torchvision's ResNet-18 / MobileNetV2 (``examples.vision``).

Their dependencies are the ``examples`` extra: ``pip install -e '.[examples]'``.
"""
