"""The run machinery every operator shares: where rows come from (:mod:`.sources`), where
outcomes go (:mod:`.outputs`), what a retry skips (:mod:`.checkpoint`) and what the log and
the summary say (:mod:`.progress`)."""
