"""Development fixtures: random tiny models, the real pretrained model shipped as a wheel, the demo."""
