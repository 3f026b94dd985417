# nixpkgs' lib.evalModules, reduced to what the stand-in needs (lib.nix says what it leaves
# out). A module is a path, a function of the module arguments, or an attrset; its
# definitions are merged attribute by attribute, so `config` can be read while it is built.
lib:
{
  modules,
  specialArgs ? { },
  # Module arguments computed from the final config, as nixpkgs derives pkgs.
  moduleArgs ? config: { },
}:
let
  inherit (builtins)
    all
    attrNames
    concatLists
    concatMap
    concatStringsSep
    elem
    filter
    foldl'
    genList
    genericClosure
    head
    isAttrs
    isFunction
    isList
    isPath
    isString
    length
    mapAttrs
    removeAttrs
    ;

  args =
    specialArgs
    // moduleArgs config
    // {
      inherit lib config options;
    };

  showPath = path: concatStringsSep "." path;
  isOption = value: isAttrs value && (value._type or null) == "option";
  indexed = f: list: genList (i: f i (builtins.elemAt list i)) (length list);

  # Files are identified by path, so a module imported twice is evaluated once.
  withKey =
    fallback: module: {
      key = if isPath module || isString module then toString module else fallback;
      inherit module;
    };

  load =
    { key, module }:
    let
      imported = if isPath module || isString module then import module else module;
      value = if isFunction imported then imported args else imported;
      structured = value ? options || value ? config;
    in
    {
      inherit key;
      imports = indexed (i: withKey "${key}:imports.${toString i}") (value.imports or [ ]);
      options = value.options or { };
      config =
        if structured then
          value.config or { }
        else
          removeAttrs value [
            "imports"
            "_file"
            "key"
            "disabledModules"
          ];
    };

  loaded = map load (genericClosure {
    startSet = indexed (i: withKey "<modules>.${toString i}") modules;
    operator = item: (load item).imports;
  });

  mergeDeclarations =
    path: a: b:
    a
    // mapAttrs (
      name: declared:
      if !(a ? ${name}) then
        declared
      else if isOption a.${name} || isOption declared then
        throw "The option `${showPath (path ++ [ name ])}' is declared more than once."
      else
        mergeDeclarations (path ++ [ name ]) a.${name} declared
    ) b;

  options = foldl' (mergeDeclarations [ ]) { } (map (m: m.options) loaded);

  # mkIf/mkOverride/mkMerge around an attrset become the same around each attribute, so the
  # attribute names are known without evaluating conditions, as in nixpkgs' lib.
  pushDown =
    value:
    let
      type = value._type or null;
    in
    if type == "merge" then
      concatMap pushDown value.contents
    else if type == "if" then
      map (mapAttrs (_: lib.mkIf value.condition)) (pushDown value.content)
    else if type == "override" then
      map (mapAttrs (_: lib.mkOverride value.priority)) (pushDown value.content)
    else
      [ value ];

  unwrapped =
    value:
    if elem (value._type or null) [
      "if"
      "override"
    ] then
      unwrapped value.content
    else
      value;

  # An attrset definition is a namespace of further options, unless it is a derivation.
  isNamespace =
    value:
    let
      inner = unwrapped value;
    in
    if (inner._type or null) == "merge" then
      all isNamespace inner.contents
    else
      isAttrs inner && !(inner ? _type) && !lib.isDerivation inner;

  # -> [ { priority, value } ]; the outermost override decides the priority.
  discharge =
    priority: value:
    let
      type = value._type or null;
    in
    if type == "if" then
      lib.optionals value.condition (discharge priority value.content)
    else if type == "override" then
      discharge (if priority == null then value.priority else priority) value.content
    else if type == "merge" then
      concatMap (discharge priority) value.contents
    else
      [ { inherit priority value; } ];

  mergeLeaf =
    path: declaration: definitions:
    let
      name = showPath path;
      defined = concatMap (
        definition:
        map (candidate: {
          inherit (definition) file;
          inherit (candidate) value;
          priority = if candidate.priority == null then 100 else candidate.priority;
        }) (discharge null definition.value)
      ) definitions;
      candidates =
        defined
        ++ lib.optional (declaration ? default) {
          file = "the default of `${name}'";
          priority = 1500;
          value = declaration.default;
        };
      best = foldl' (
        lowest: candidate: if candidate.priority < lowest then candidate.priority else lowest
      ) 100000 candidates;
      winners = filter (c: c.priority == best) candidates;
      values = map (c: c.value) winners;
      merged =
        if winners == [ ] then
          throw "The option `${name}' is used but not defined."
        # One definition is taken as it is, as nixpkgs does: comparing it with itself would
        # force a derivation's outPath, and with it any assertion inside the derivation.
        else if length values == 1 then
          head values
        else if all isList values then
          concatLists values
        else if all (v: v == head values) values then
          head values
        else
          throw "The option `${name}' has conflicting definition values in ${
            concatStringsSep ", " (map (c: c.file) winners)
          }.";
    in
    if declaration ? type && !(declaration.type.check merged) then
      throw "The option `${name}' is not of type `${declaration.type.name}'."
    else
      merged;

  mergeNode =
    path: declaration: definitions:
    if isOption declaration then
      mergeLeaf path declaration definitions
    else if declaration == null && !(all (d: isNamespace d.value) definitions) then
      mergeLeaf path { } definitions
    else
      let
        declared = if declaration == null then { } else declaration;
        pushed = concatMap (
          definition:
          map (value: {
            inherit (definition) file;
            inherit value;
          }) (pushDown definition.value)
        ) definitions;
        names = attrNames declared ++ concatMap (d: attrNames d.value) pushed;
      in
      lib.genAttrs names (
        name:
        mergeNode (path ++ [ name ]) (declared.${name} or null) (
          concatMap (
            d:
            lib.optional (d.value ? ${name}) {
              inherit (d) file;
              value = d.value.${name};
            }
          ) pushed
        )
      );

  config = mergeNode [ ] options (
    map (m: {
      file = m.key;
      value = m.config;
    }) loaded
  );
in
{
  _type = "configuration";
  inherit config options;
  _module.args = args;
}
