"""Targets: the SKU catalog (data), backends that build for a SKU, and hardware detection."""
