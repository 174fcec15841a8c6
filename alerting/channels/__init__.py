"""Delivery channels behind one interface (`base.Channel`); `alerting.delivery` dispatches to them."""
