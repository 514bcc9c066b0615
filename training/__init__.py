"""defectscope.training"""
