"""A request's inputs made model-ready: fetched without reaching where it must not (`fetch`,
`netguard`), decoded within limits (`images`, `video`, in worker processes: `decode_pool`), and
its chat rendered and tokenized (`prompts`)."""
