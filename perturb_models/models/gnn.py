"""Graph encoders over gene networks: PerturbQA's GAT baseline and a GEARS-style SGConv encoder.

Both propagate over the whole gene graph once per forward call and then index the batch's
perturbation and gene nodes, so the cost of a step does not grow with the number of pairs in it.
In evaluation mode the node states are computed once and reused until the weights can change again
(``train()`` or a state-dict load).

Node inputs are a learned vector per node, plus, with ``node_features`` (e.g. ``text``: the MiniLM
embedding of each gene's GenePT-style text, see knowledge/embeddings.py), a trained linear projection of
fixed gene features. Features give an unseen perturbation's node an informative input of its own rather
than only what message passing brings from its neighbours.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch_geometric.nn import GATConv, SGConv

from perturb_models.data.datamodule import DataContext
from perturb_models.knowledge.graphs import GeneGraph, build_graphs, new_gene_touched
from perturb_models.models.base import Encoder
from perturb_models.models.embedding import GeneEmbeddings, embedding_spec
from perturb_models.models.layers import PairMLP

log = logging.getLogger(__name__)


def node_feature_spec(
    node_features: str | Mapping[str, Any] | None, knowledge: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """``model.encoder.node_features`` as an embedding spec: null (no features), a source name
    (``text``, ``random``) or a full spec mapping (``{source: table, path: genept.pkl}``).

    ``knowledge`` (the run's ``knowledge`` config: ``root``, ``allow_download``) fills the spec's
    ``knowledge_root`` and ``allow_download`` where the spec does not set them."""
    if node_features is None or node_features is False:
        return None
    if isinstance(node_features, str):
        if node_features.lower() in ("", "none", "null"):
            return None
        node_features = {"source": node_features}
    if not isinstance(node_features, Mapping):
        raise ValueError(
            f"model.encoder.node_features={node_features!r}: expected null, a source name "
            "(text, table, random, summer) or a mapping like {source: table, path: FILE}"
        )
    node_features = dict(node_features)
    for key, spec_key in (("root", "knowledge_root"), ("allow_download", "allow_download")):
        if knowledge is not None and knowledge.get(key) is not None:
            node_features.setdefault(spec_key, knowledge[key])
    try:
        return embedding_spec(node_features)
    except ValueError as err:
        raise ValueError(str(err).replace("model.encoder.embeddings", "model.encoder.node_features")) from None


def build_node_features(
    context: DataContext, node_features: str | Mapping[str, Any] | None, knowledge: Mapping[str, Any] | None = None
) -> GeneEmbeddings | None:
    """Fixed per-gene input features (standardised, plus a missing flag) or None."""
    spec = node_feature_spec(node_features, knowledge)
    if spec is None:
        return None
    features = GeneEmbeddings(context, spec, missing="learned", standardize=True, finetune=False)
    log.info(
        "graph node features: %s, %d dims, %d of %d genes without a vector",
        features.source,
        features.output_dim - 1,
        features.num_missing,
        len(context.vocab),
    )
    return features


class NodeEmbedding(nn.Module):
    """A learned vector per graph node, plus a shared learned vector added to genes without any edge,
    plus (with ``feature_dim``) a trained projection of fixed gene features given to ``forward``.

    Genes absent from every graph are explicit isolated nodes: their own embedding (trained when the
    gene appears in training pairs) plus the shared "no graph knowledge" vector, counted in the log.
    Gene nodes come first in every graph; other nodes (GO terms of ``go_kg``) have no gene features.
    """

    def __init__(self, graph: GeneGraph, dim: int, name: str, feature_dim: int | None = None):
        super().__init__()
        self.num_genes = graph.num_genes
        # Genes of the training vocabulary and the graph's other nodes after them: genes appended later
        # (predict.py) get nodes after those, so a vocabulary index maps to a node through node_index.
        self.trained_genes, self.num_other = graph.num_genes, graph.num_nodes - graph.num_genes
        self.table = nn.Embedding(graph.num_nodes, dim)
        nn.init.normal_(self.table.weight, std=0.1)
        self.feature_projection = nn.Linear(feature_dim, dim) if feature_dim else None
        self.isolated_vector = nn.Parameter(torch.zeros(dim))
        isolated = torch.zeros(graph.num_nodes, dtype=torch.bool)
        isolated[: graph.num_genes] = ~graph.gene_has_edge()
        self.register_buffer("isolated", isolated, persistent=False)
        log.info(
            "%s: %d of %d genes have no edge in any graph; they are isolated nodes with a learned embedding",
            name,
            int(isolated.sum()),
            graph.num_genes,
        )
        self.num_isolated = int(isolated.sum())

    def extend_vocabulary(self, num_new: int, new_has_edge: torch.Tensor) -> None:
        """Nodes for ``num_new`` genes appended to the vocabulary, after every node there is: a zero learned
        vector (never trained), plus the shared "no graph knowledge" vector for those without an edge."""
        weight = self.table.weight
        self.table.weight = nn.Parameter(
            torch.cat([weight.detach(), weight.new_zeros(num_new, weight.shape[1])]), requires_grad=weight.requires_grad
        )
        self.table.num_embeddings += num_new
        self.isolated = torch.cat([self.isolated, ~new_has_edge.to(self.isolated.device)])
        self.num_genes += num_new

    def node_index(self, genes: torch.Tensor) -> torch.Tensor:
        """Node ids of vocabulary indices: the same for training genes, after the other nodes for appended ones."""
        if self.num_other == 0 or self.num_genes == self.trained_genes:
            return genes
        return genes + self.num_other * (genes >= self.trained_genes)

    def learned(self) -> torch.Tensor:
        """The learned part: a vector per node (+ the shared vector of isolated genes)."""
        return self.table.weight + self.isolated[:, None].to(self.table.weight.dtype) * self.isolated_vector

    def projected_features(self, gene_features: torch.Tensor | None) -> torch.Tensor | None:
        """The fixed-feature part, (num_nodes, dim) with zero rows for non-gene nodes; None without features."""
        if self.feature_projection is None:
            return None
        if gene_features is None or gene_features.shape[0] != self.num_genes:
            raise ValueError(
                f"node features: expected one row per gene ({self.num_genes}), got "
                f"{None if gene_features is None else tuple(gene_features.shape)}"
            )
        projected = self.feature_projection(gene_features.to(self.table.weight.dtype))
        padding = projected.new_zeros(self.num_other, projected.shape[1])
        trained = self.trained_genes
        return torch.cat([projected[:trained], padding, projected[trained:]], dim=0)

    def forward(self, gene_features: torch.Tensor | None = None) -> torch.Tensor:
        h = self.learned()
        features = self.projected_features(gene_features)
        return h if features is None else h + features


def _graph_buffers(module: nn.Module, graph: GeneGraph, prefix: str) -> None:
    # Stored in the checkpoint, so a re-test uses the graph the model was trained on, and a rebuilt
    # graph that differs fails loudly on load instead of silently changing the model's inputs.
    module.register_buffer(f"{prefix}_edge_index", graph.edge_index.clone())
    module.register_buffer(f"{prefix}_edge_type", graph.edge_type.clone())
    module.register_buffer(f"{prefix}_edge_weight", graph.edge_weight.clone().float())


def _extend_graph_buffers(module: nn.Module, prefix: str, new_edges: GeneGraph) -> torch.Tensor:
    """Append edges (all pointing into new genes) after the stored ones, so every known node keeps its
    in-edges in the same order; returns which new genes touch an edge."""
    index = getattr(module, f"{prefix}_edge_index")
    edge_index = new_edges.edge_index.to(index.device)
    setattr(module, f"{prefix}_edge_index", torch.cat([index, edge_index], dim=1))
    setattr(
        module,
        f"{prefix}_edge_type",
        torch.cat([getattr(module, f"{prefix}_edge_type"), new_edges.edge_type.to(index.device)]),
    )
    weight = getattr(module, f"{prefix}_edge_weight")
    setattr(module, f"{prefix}_edge_weight", torch.cat([weight, new_edges.edge_weight.to(weight.device, weight.dtype)]))
    return new_gene_touched(new_edges)


def _new_edges(specs: Mapping[str, Mapping[str, Any]] | None, context: DataContext, known: int) -> GeneGraph:
    """The in-edges of the genes appended to ``context``'s vocabulary (none for a branch that takes none)."""
    from perturb_models.knowledge.graphs import new_gene_edges

    if specs is None:
        new = list(context.vocab.symbols[known:])
        empty = torch.zeros((2, 0), dtype=torch.long)
        return GeneGraph(
            known, empty, torch.zeros(0, dtype=torch.long), torch.zeros(0), ["edge"], new, {"new_genes": len(new)}
        )
    return new_gene_edges(specs, context, known)


class _CachedNodeStates(Encoder):
    """Caches full-graph node states in eval mode; cleared on ``train()`` and on state-dict loads."""

    def __init__(self):
        super().__init__()
        self._node_cache: Any = None
        self.register_load_state_dict_post_hook(lambda module, keys: module._clear_cache())

    def _clear_cache(self) -> None:
        self._node_cache = None

    def train(self, mode: bool = True):
        self._clear_cache()
        return super().train(mode)

    def node_states(self):
        raise NotImplementedError

    def cached_node_states(self):
        if self.training or torch.is_grad_enabled():
            self._node_cache = None
            return self.node_states()
        if self._node_cache is None:
            self._node_cache = self.node_states()
        return self._node_cache


class GATEncoder(_CachedNodeStates):
    """PerturbQA's GAT baseline: GATConv layers over the (multi-relational) gene graph with learned
    edge-type embeddings (plus the edge weight) as edge features, each in a residual LayerNorm block;
    the (perturbation node, gene node) states, concatenated, feed a residual pair MLP.

    Args:
        graphs: named graph specs (``conf/graph/*.yaml``), combined into one graph, one edge type per source.
        hidden_dim: node state size; heads: attention heads (``hidden_dim`` must divide by it).
        node_features: fixed gene features projected into the node inputs: null, ``text``, ``random`` or an
            embedding spec (``{source: table, path: FILE}``); see ``node_feature_spec``.
        knowledge: the run's ``knowledge`` config (``root``, ``allow_download``) for text node features.
    """

    def __init__(
        self,
        context: DataContext,
        graphs: Mapping[str, Mapping[str, Any]],
        hidden_dim: int = 64,
        num_layers: int = 2,
        heads: int = 4,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
        edge_dim: int = 16,
        pair_hidden_dim: int = 256,
        pair_blocks: int = 2,
        node_features: str | Mapping[str, Any] | None = None,
        knowledge: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        if hidden_dim % heads:
            raise ValueError(f"model.encoder.hidden_dim={hidden_dim} must be a multiple of heads={heads}")
        graph = build_graphs(graphs, context)
        self.graph_specs = {name: dict(spec) for name, spec in graphs.items()}
        self.num_genes = graph.num_genes
        self.relations = list(graph.relations)
        self.node_features = build_node_features(context, node_features, knowledge)
        self.nodes = NodeEmbedding(graph, hidden_dim, "gat", _feature_dim(self.node_features))
        _graph_buffers(self, graph, "graph")
        # Edge features are small (edge_dim): GATConv projects them once per edge and layer, the main cost on CPU.
        self.edge_type_embedding = nn.Embedding(max(1, graph.num_relations), edge_dim)
        self.edge_weight_projection = nn.Linear(1, edge_dim, bias=False)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden_dim) for _ in range(num_layers))
        self.convs = nn.ModuleList(
            GATConv(
                hidden_dim,
                hidden_dim // heads,
                heads=heads,
                dropout=attention_dropout,
                edge_dim=edge_dim,
                add_self_loops=True,
                fill_value="mean",
            )
            for _ in range(num_layers)
        )
        self.dropout = nn.Dropout(dropout)
        self.out_norm = nn.LayerNorm(hidden_dim)
        self.pair = PairMLP(2 * hidden_dim, pair_hidden_dim, pair_blocks, dropout)
        self.output_dim = pair_hidden_dim

    def node_states(self) -> torch.Tensor:
        h = self.nodes(_all_gene_features(self.node_features))
        edge_attr = self.edge_type_embedding(self.graph_edge_type) + self.edge_weight_projection(
            self.graph_edge_weight[:, None]
        )
        for norm, conv in zip(self.norms, self.convs):
            h = h + self.dropout(nn.functional.gelu(conv(norm(h), self.graph_edge_index, edge_attr)))
        return self.out_norm(h)

    describes_new_perturbations = True

    def extend_vocabulary(self, context: DataContext) -> None:
        """A new gene's node gets in-edges from its known graph neighbours (none out), a zero learned vector
        and, with ``node_features``, its own features: known nodes' states do not change."""
        known = self.num_genes
        if context.num_genes == known:
            return
        if self.node_features is not None:
            self.node_features.extend_vocabulary(context)
        has_edge = _extend_graph_buffers(self, "graph", _new_edges(self.graph_specs, context, known))
        self.nodes.extend_vocabulary(context.num_genes - known, has_edge)
        self.num_genes = context.num_genes
        self._clear_cache()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.cached_node_states()
        node = self.nodes.node_index
        return self.pair(torch.cat([h[node(batch["pert"])], h[node(batch["gene"])]], dim=-1))


def _feature_dim(features: GeneEmbeddings | None) -> int | None:
    return None if features is None else features.output_dim


def _all_gene_features(features: GeneEmbeddings | None) -> torch.Tensor | None:
    if features is None:
        return None
    return features(torch.arange(features.table.shape[0], device=features.table.device))


class SGBranch(nn.Module):
    """Learned node embeddings (plus projected gene features, when given) smoothed by SGConv
    (K hops of normalised propagation, then a linear map)."""

    def __init__(
        self,
        graph: GeneGraph,
        dim: int,
        hops: int,
        name: str,
        feature_dim: int | None = None,
        include_self: bool = True,
    ):
        super().__init__()
        self.nodes = NodeEmbedding(graph, dim, name, feature_dim)
        _graph_buffers(self, graph, "graph")
        self.include_self = include_self
        self.conv = SGConv(dim, dim, K=hops, cached=False, add_self_loops=include_self)
        self.norm = nn.LayerNorm(dim)

    def extend_vocabulary(self, new_edges: GeneGraph, known: int) -> None:
        has_edge = _extend_graph_buffers(self, "graph", new_edges)
        self.nodes.extend_vocabulary(int(new_edges.info["new_genes"]), has_edge)

    def forward(self, gene_features: torch.Tensor | None = None) -> torch.Tensor:
        own_features = self.nodes.projected_features(gene_features)
        learned = self.nodes.learned()
        x = learned if own_features is None else learned + own_features
        smoothed = self.conv(x, self.graph_edge_index, self.graph_edge_weight)
        if self.include_self:
            # The raw embedding is kept next to the smoothed one (GEARS adds the GNN output to the base embedding).
            return self.norm(x + smoothed)
        # Without self: the node's own learned vector is left out, but its fixed features (known for an
        # unseen perturbation too) are kept.
        return self.norm(smoothed if own_features is None else smoothed + own_features)


class GEARSEncoder(_CachedNodeStates):
    """GEARS adapted to classification: the perturbation's embedding is smoothed over the GO graph
    (``pert_graphs``), the downstream gene's over the co-response graph (``gene_graphs``), each by SGConv;
    the pair ``[p, g, p * g]`` goes through a residual pair MLP. Both propagations run once per step.
    With ``node_features`` both branches start from the same fixed gene features (one copy, stored once
    in the checkpoint), each through its own trained projection.

    ``pert_include_self=false`` (the default) describes a perturbation by its graph neighbours (no self
    loop, no residual of its own learned vector) plus its own fixed node features if any: the learned
    vector of an unseen perturbation is never trained as a perturbation, so training perturbations are
    then represented the way test ones must be. ``true`` is GEARS' own recipe."""

    def __init__(
        self,
        context: DataContext,
        pert_graphs: Mapping[str, Mapping[str, Any]],
        gene_graphs: Mapping[str, Mapping[str, Any]],
        hidden_dim: int = 64,
        hops: int = 2,
        dropout: float = 0.1,
        pair_hidden_dim: int = 256,
        pair_blocks: int = 2,
        node_features: str | Mapping[str, Any] | None = None,
        pert_include_self: bool = False,
        knowledge: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.node_features = build_node_features(context, node_features, knowledge)
        feature_dim = _feature_dim(self.node_features)
        self.pert_graph_specs = {name: dict(spec) for name, spec in pert_graphs.items()}
        self.pert_branch = SGBranch(
            build_graphs(pert_graphs, context),
            hidden_dim,
            hops,
            "gears perturbation graph",
            feature_dim,
            include_self=pert_include_self,
        )
        self.gene_branch = SGBranch(
            build_graphs(gene_graphs, context), hidden_dim, hops, "gears gene graph", feature_dim
        )
        self.pair = PairMLP(3 * hidden_dim, pair_hidden_dim, pair_blocks, dropout)
        self.output_dim = pair_hidden_dim

    def node_states(self) -> tuple[torch.Tensor, torch.Tensor]:
        features = _all_gene_features(self.node_features)
        return self.pert_branch(features), self.gene_branch(features)

    describes_new_perturbations = True

    def extend_vocabulary(self, context: DataContext) -> None:
        """A new gene, as a perturbation, gets in-edges from its known neighbours in the perturbation graph
        (GO) and, with ``node_features``, its own features; in the gene branch it is an isolated node (it has
        no training response, and predict.py asks only about genes the model was trained to score)."""
        known = self.pert_branch.nodes.num_genes
        if context.num_genes == known:
            return
        if self.node_features is not None:
            self.node_features.extend_vocabulary(context)
        self.pert_branch.extend_vocabulary(_new_edges(self.pert_graph_specs, context, known), known)
        self.gene_branch.extend_vocabulary(_new_edges(None, context, known), known)
        self._clear_cache()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        pert_states, gene_states = self.cached_node_states()
        p = pert_states[self.pert_branch.nodes.node_index(batch["pert"])]
        g = gene_states[self.gene_branch.nodes.node_index(batch["gene"])]
        return self.pair(torch.cat([p, g, p * g], dim=-1))
