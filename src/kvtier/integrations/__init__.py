"""Engine integrations: transformers (:mod:`kvtier.integrations.transformers`) and vLLM
(:mod:`kvtier.integrations.vllm`). The core never imports these; they import the core and the client."""
