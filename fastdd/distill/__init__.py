"""Distillation: the engine, its configuration, and the method plug-ins."""
from fastdd.distill.config import DistillConfig, build_config
from fastdd.distill.engine import Distiller
from fastdd.distill.methods import METHODS, Method, MethodOutput, build_method, register_method

__all__ = ["DistillConfig", "Distiller", "METHODS", "Method", "MethodOutput", "build_config", "build_method",
           "register_method"]
