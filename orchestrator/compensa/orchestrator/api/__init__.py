"""The gRPC face: OrchestratorService, its views of sagas, the streams it serves, access control."""
