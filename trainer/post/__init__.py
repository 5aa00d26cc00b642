"""Post-training: quantizing final/ into the served formats, exporting them, and measuring each in its
engine."""
