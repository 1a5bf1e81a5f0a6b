"""gRPC plumbing shared by every service: generated stubs (gen/), servers and channels."""
