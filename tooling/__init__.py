"""Tools around the gateway that serving never imports: provisioning the local small model
(vLLM's CPU build and the model conversion), the demo, and cache operations."""
