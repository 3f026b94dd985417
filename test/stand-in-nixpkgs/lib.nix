# The part of nixpkgs' lib that release-boot's flake.nix and the stub modules use, with the
# module evaluator in eval-modules.nix. It keeps the semantics the flake relies on: imports,
# option defaults, mkIf/mkDefault/mkForce/mkMerge, lists that concatenate, conflicting values
# that fail, and type checks for the few types declared. It does not reject undeclared
# options (nixpkgs declares thousands; the stand-in declares the few the flake reads), so a
# misspelt NixOS option name passes here and fails against real nixpkgs.
let
  inherit (builtins)
    all
    isAttrs
    isBool
    isList
    isString
    listToAttrs
    ;

  lib = rec {
    genAttrs =
      names: f:
      listToAttrs (
        map (name: {
          inherit name;
          value = f name;
        }) names
      );
    concatStringsSep = builtins.concatStringsSep;
    concatMapStrings = f: list: builtins.concatStringsSep "" (map f list);
    escapeShellArg = arg: "'${builtins.replaceStrings [ "'" ] [ "'\\''" ] (toString arg)}'";
    optional = condition: value: if condition then [ value ] else [ ];
    optionals = condition: values: if condition then values else [ ];
    optionalAttrs = condition: attrs: if condition then attrs else { };
    hasPrefix = prefix: s: builtins.substring 0 (builtins.stringLength prefix) s == prefix;
    isDerivation = value: isAttrs value && (value.type or null) == "derivation";

    types =
      let
        type = name: check: { inherit name check; };
      in
      {
        str = type "str" isString;
        bool = type "bool" isBool;
        attrs = type "attrs" isAttrs;
        package = type "package" isDerivation;
        # Like nixpkgs' types.path: a path value, or a string that is an absolute path.
        path = type "path" (value: builtins.isPath value || (isString value && hasPrefix "/" value));
        listOf = elem: type "listOf ${elem.name}" (value: isList value && all elem.check value);
        nullOr = elem: type "null or ${elem.name}" (value: value == null || elem.check value);
      };

    mkOption = attrs: attrs // { _type = "option"; };
    mkOverride = priority: content: {
      _type = "override";
      inherit priority content;
    };
    mkDefault = mkOverride 1000;
    mkImageMediaOverride = mkOverride 60;
    mkForce = mkOverride 50;
    mkIf = condition: content: {
      _type = "if";
      inherit condition content;
    };
    mkMerge = contents: {
      _type = "merge";
      inherit contents;
    };

    evalModules = import ./eval-modules.nix lib;

    # nixpkgs' lib.nixosSystem: modules plus what every NixOS system has (stand-in-system.nix),
    # with pkgs chosen by nixpkgs.hostPlatform.
    nixosSystem =
      {
        modules,
        specialArgs ? { },
      }:
      let
        evaluated = evalModules {
          modules = [ ./nixos/modules/stand-in-system.nix ] ++ modules;
          specialArgs = {
            modulesPath = ./nixos/modules;
          }
          // specialArgs;
          moduleArgs = config: {
            pkgs = import ./pkgs.nix { system = config.nixpkgs.hostPlatform; };
          };
        };
      in
      evaluated // { inherit (evaluated._module.args) pkgs; };
  };
in
lib
