"""Engine integrations: transformers (:mod:`kvtier.integrations.transformers`), vLLM (:mod:`kvtier.integrations.vllm`)
and SGLang's HiCache (:mod:`kvtier.integrations.sglang`). The core never imports these; they import the core and
the client."""
