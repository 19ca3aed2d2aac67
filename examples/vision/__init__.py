"""torchvision's ResNet-18 and MobileNetV2 on random crops of scikit-learn's two sample photos."""
