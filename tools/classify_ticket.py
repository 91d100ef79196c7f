#!/usr/bin/env python3
"""Keyword ticket classifier: {"text"} -> {"category", "priority"}."""
import json, sys

text = (json.load(sys.stdin).get("text") or "").lower()
if any(w in text for w in ("charge", "invoice", "refund", "billing")):
    category = "billing"
elif any(w in text for w in ("error", "crash", "login", "bug")):
    category = "technical"
else:
    category = "general"
priority = 3 if any(w in text for w in ("twice", "urgent", "down")) else 1
json.dump({"category": category, "priority": priority}, sys.stdout)
