"""Structured outputs: what a request's answer must look like (`spec`), the grammar that enforces
it token by token (`grammar`), and forced tool calls (`tools`)."""
