"""What the service offers: attacks (with the knowledge each needs), architectures (with their
knobs), defenses, metrics and the knowledge levels."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from api.deps import RuntimeDep, Tenant
from api.schemas import Catalog, KnowledgeLevel
from service.specs import Knowledge

router = APIRouter(prefix="/v1", tags=["catalog"])


@router.get("/catalog", response_model=Catalog, summary="Attacks, architectures, defenses, metrics")
async def catalog(rt: RuntimeDep, tenant: Tenant) -> Catalog:
    entries = await run_in_threadpool(rt.catalog)
    levels = [KnowledgeLevel(level=int(k), name=k.name.lower(), description=k.describe) for k in Knowledge]
    return Catalog(**entries, knowledge_levels=levels)
