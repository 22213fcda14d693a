using System.Diagnostics;
using UblkSharp.Ublk;

namespace UblkSharp.VmTests;

/// <summary>
/// Facts about the guest these tests run in. The suite never skips: a machine without the driver
/// fails every test with a message that says how to run it (tools/ublksharp-vm).
/// </summary>
internal static class VmEnvironment
{
    public static string KernelRelease { get; } = File.ReadAllText("/proc/sys/kernel/osrelease").Trim();

    public static bool Is612 => KernelRelease.StartsWith("6.12.", StringComparison.Ordinal);

    public static void RequireDriver()
    {
        if (!File.Exists(ControlDevice.Path))
        {
            Assert.Fail($"{ControlDevice.Path} is missing on kernel {KernelRelease}. These tests need the ublk driver: run them with tools/ublksharp-vm (see README).");
        }
    }

    /// <summary>The repository root (the folder with UblkSharp.slnx) above the test assembly.</summary>
    public static string RepoRoot
    {
        get
        {
            for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
            {
                if (File.Exists(Path.Combine(dir.FullName, "UblkSharp.slnx")))
                {
                    return dir.FullName;
                }
            }
            throw new InvalidOperationException("UblkSharp.slnx not found above " + AppContext.BaseDirectory);
        }
    }

    /// <summary>The built CLI (Release), run directly: the guest has no network to restore or build with.</summary>
    public static string CliDll => Path.Combine(RepoRoot, "src", "UblkSharp.Cli", "bin", "Release", "net10.0", "UblkSharp.Cli.dll");

    public static (int ExitCode, string Output) RunCli(string args, TimeSpan? timeout = null)
    {
        if (!File.Exists(CliDll))
        {
            Assert.Fail($"{CliDll} is missing: build the solution in Release first (./test.sh does)");
        }
        return Run("dotnet", $"{CliDll} {args}", timeout ?? TimeSpan.FromMinutes(3));
    }

    /// <summary>Runs a program with a time bound; returns its exit code and combined output.</summary>
    public static (int ExitCode, string Output) Run(string file, string args, TimeSpan timeout)
    {
        var psi = new ProcessStartInfo(file, args) { RedirectStandardOutput = true, RedirectStandardError = true };
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(timeout))
        {
            p.Kill(entireProcessTree: true);
            Assert.Fail($"{file} {args} did not finish within {timeout.TotalSeconds} s");
        }
        return (p.ExitCode, stdout.Result + stderr.Result);
    }
}
