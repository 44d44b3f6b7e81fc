"""llava-serve: serve LLaVA-family vision-language models on Ray Serve."""
