"""Transaction semantics as pure code: OCC validation, vector-clock conflicts, resolvers, 2PC."""
