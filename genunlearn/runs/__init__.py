"""The run flow by stage (forget, evaluate, pretrain), written once over the per-kind adapters in ``genunlearn.kinds``."""
