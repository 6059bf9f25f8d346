"""One module per source; each samples something and returns samples for the store."""
