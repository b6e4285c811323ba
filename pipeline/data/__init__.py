"""Source images, degradations, patches, prepared splits and benchmark folders."""
