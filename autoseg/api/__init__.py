"""The library API each command calls: plan, train, pretrain, predict, select, model files. May import every library
package (never ``planners``/``trainers`` once the plugin registry lands; ``commands`` sit above)."""
