"""Use cases: booting sandboxes, running commands in them."""
