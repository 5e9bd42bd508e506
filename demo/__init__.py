"""The Idlegrid demo and the process cluster it (and the end-to-end tests) run on."""
