"""torchless: LLM inference for Mistral- and Llama-family models on CPUs, without PyTorch."""
