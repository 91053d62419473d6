"""Compensa: a saga orchestrator for gRPC services."""
