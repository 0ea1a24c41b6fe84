"""What the service tells about itself: Prometheus metrics (`/metrics`) and a status page for people (`/ccm/`)."""
