"""engine_build: turn the trained model into serving engines and measure them."""
