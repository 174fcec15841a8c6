"""The dev kit: tiny random models of the real classes for tests and demos, and the trained reference pair."""
