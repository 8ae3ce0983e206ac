"""`lorakit export`: an adapter (or the model merged with it) in the formats people run models with.

    gguf-adapter   a LoRA adapter GGUF for llama.cpp's --lora (`lorakit.export.gguf_adapter`)
    gguf           the merged model as one GGUF file, tokenizer and chat template inside
                   (`lorakit.export.gguf_model`)
    ollama         a directory with a GGUF and a Modelfile (`lorakit.export.ollama`)
    vllm           the adapter checked against vLLM's LoRA loader (`lorakit.export.vllm`)

GGUF names and llama.cpp's q/k layout: `lorakit.export.names`.
"""
