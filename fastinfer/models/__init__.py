"""Built-in models: weights readers and graph builders for models fastinfer ships by default."""
