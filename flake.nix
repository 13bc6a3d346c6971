{
  # Dev shells that pin the lab's toolchain: `nix develop .#cpu` and `nix develop .#cuda`.
  # The lab evaluates a harness in one with `--env nix` (lab/envs/nix.py runs
  # `nix develop <flake>#<shell> --command python -m lab.runner ...`, the lab's package coming
  # from the checkout on PYTHONPATH). nixpkgs is pinned by revision here; `nix flake lock` adds
  # its narHash to flake.lock, which is what the environment's reference hashes.
  #
  # The GPU driver is never part of the shell: it is the host's. On NixOS it lies in
  # /run/opengl-driver/lib (hardware.graphics.enable plus the NVIDIA driver). Elsewhere, either
  # run the shell through nixGL or expose the host's libcuda there (docs/environments.md).
  #
  # Written without a Nix installation at hand: never evaluated or built (docs/environments.md).
  description = "lab: pinned toolchains for evaluating harnesses (CPU and CUDA dev shells)";

  inputs = {
    # nixos-25.11 at 2026-05-26.
    nixpkgs.url = "github:NixOS/nixpkgs/25f538306313eae3927264466c70d7001dcea1df";
  };

  outputs = { self, nixpkgs }:
    let
      lib = nixpkgs.lib;
      linux = [ "x86_64-linux" "aarch64-linux" ];
      systems = linux ++ [ "aarch64-darwin" ];

      pkgsFor = system: import nixpkgs {
        inherit system;
        # CUDA and the torch binary are unfree; nothing unfree enters the cpu shell.
        config.allowUnfree = true;
      };

      # What every shell has: the compilers the harnesses build with, and the lab's core Python.
      common = pkgs: [
        pkgs.stdenv.cc
        pkgs.gnumake
        pkgs.cmake
        pkgs.ninja
        pkgs.ccache
        pkgs.git
        pkgs.bubblewrap # the sandbox of every candidate process (lab/sandbox.py)
        pkgs.util-linux # setpriv: the sandbox's drop to uid 65534 when the lab runs as root
      ];
      pythonWith = pkgs: extra: pkgs.python312.withPackages (ps: [
        ps.click
        ps.numpy
        ps.rich
        ps.pytest
        ps.docker
      ] ++ extra ps);

      cpuShell = pkgs: pkgs.mkShell {
        name = "lab-cpu";
        packages = common pkgs ++ [ (pythonWith pkgs (ps: [ ])) ];
        shellHook = ''
          export LAB_ENV=nix-cpu
        '';
      };

      cudaShell = pkgs:
        let
          # CUDA 12.8, as in Dockerfile.cuda; the default set where this revision has no 12.8.
          cuda = pkgs.cudaPackages_12_8 or pkgs.cudaPackages;
          toolkit = pkgs.symlinkJoin {
            name = "lab-cuda-toolkit";
            paths = [
              cuda.cuda_nvcc
              cuda.cuda_cudart
              cuda.cuda_cccl
              cuda.cuda_nvrtc
              cuda.libcublas
              cuda.cuda_cupti
            ];
          };
        in
        pkgs.mkShell {
          name = "lab-cuda";
          packages = common pkgs ++ [
            toolkit
            (pythonWith pkgs (ps: [ ps.torch-bin ps.nvidia-ml-py ]))
          ];
          shellHook = ''
            export LAB_ENV=nix-cuda
            export CUDA_HOME=${toolkit}
            export CUDA_PATH=${toolkit}
            # The host's driver (libcuda.so.1, libnvidia-ml.so.1): NixOS keeps it here; on other
            # systems nixGL sets LD_LIBRARY_PATH itself, or link the host's libraries here.
            export LD_LIBRARY_PATH=/run/opengl-driver/lib''${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
            if ! ls /run/opengl-driver/lib/libcuda.so.1 >/dev/null 2>&1 && [ -z "''${NIXGL:-}" ]; then
              echo "lab-cuda: no libcuda.so.1 in /run/opengl-driver/lib; on a non-NixOS host run the" >&2
              echo "  shell through nixGL or link the host driver there (docs/environments.md)" >&2
            fi
          '';
        };
    in
    {
      devShells = lib.genAttrs systems (system:
        let pkgs = pkgsFor system;
        in
        {
          cpu = cpuShell pkgs;
          default = cpuShell pkgs;
        } // lib.optionalAttrs (builtins.elem system linux) {
          cuda = cudaShell pkgs;
        });
    };
}
