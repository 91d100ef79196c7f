#!/usr/bin/env python3
"""Looks a customer up in a small fixture: {"customer"} -> account object; unknown = exit 1."""
import json, sys

ACCOUNTS = {"c-42": {"plan": "pro", "since": "2021-03-01", "open_invoices": 2}}
customer = json.load(sys.stdin).get("customer")
if customer not in ACCOUNTS:
    print(f"no account for customer {customer!r}", file=sys.stderr)
    sys.exit(1)
json.dump(ACCOUNTS[customer], sys.stdout)
