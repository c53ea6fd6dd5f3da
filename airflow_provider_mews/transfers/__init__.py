"""Transfer operators: Mews data into other systems (warehouse tables, files)."""
