"""Ray Serve wiring for llava-serve: thin deployment classes and the app builder."""
