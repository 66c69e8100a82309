"""KServe v2 (the Open Inference Protocol): its codec, REST routes and gRPC service, the inference
step they share, and Triton's system shared-memory extension."""
