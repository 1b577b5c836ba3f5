"""Set AutoRegressive building blocks: orders, intervals, set plans, masks, conditions, sampling."""

from sar_scale.sar.condition import Condition
from sar_scale.sar.intervals import INTERVALS, set_sizes
from sar_scale.sar.orders import ORDERS, make_order
from sar_scale.sar.plan import PlanDistribution, PlanSampler, SetPlan
from sar_scale.sar.recipe import Recipe, standard_recipes
from sar_scale.sar.sampling import filter_logits, sample, set_ar_loss

__all__ = ["INTERVALS", "ORDERS", "Condition", "PlanDistribution", "PlanSampler", "Recipe", "SetPlan",
           "filter_logits", "make_order", "sample", "set_ar_loss", "set_sizes",
           "standard_recipes"]
