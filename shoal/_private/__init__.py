"""Names Ray Serve keeps in ``ray.serve._private`` that its documented examples import."""
