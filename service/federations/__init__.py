"""Federations: a model trained over FL rounds by simulated clients, with test accuracy and IGSA per
round and attacks on chosen clients' real updates at chosen rounds. The spec is torch-free; the
loop (`service.federations.loop`) runs through the one job runner."""

from service.federations.spec import FederatedData, FederationAudit, FederationSpec, LocalTraining, Partition

__all__ = ["FederatedData", "FederationAudit", "FederationSpec", "LocalTraining", "Partition"]
