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

    /// <summary>
    /// The kernel tools/ublksharp-vm was told to boot (-k: "6.12", "7.3"), from UBLKSHARP_VM_KERNEL;
    /// null outside the harness. A test of a 7.x feature asserts the feature is used when this says
    /// 7.3, so that a kernel or harness mix-up fails instead of skipping the feature silently.
    /// </summary>
    public static string? HarnessKernel { get; } = Environment.GetEnvironmentVariable("UBLKSHARP_VM_KERNEL") is { Length: > 0 } k ? k : null;

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

    /// <summary>
    /// The CLI as ./test.sh and ./ublksharp publish it (native AOT, artifacts/cli), run directly (the
    /// guest has no network to restore or build with), from a copy in the guest's /tmp (tmpfs): as
    /// installed on a local disk. Run from the host's tree over virtio-9p, each start paged the 5 MB
    /// executable in again, 0.68 s a start against 0.27 s from tmpfs (6.12 guest, `--help` x5).
    /// </summary>
    public static string Cli => LocalCli.Value;

    private static readonly Lazy<string> LocalCli = new(() =>
    {
        var published = Path.Combine(RepoRoot, "artifacts", "cli", "ublksharp");
        if (!File.Exists(published))
        {
            Assert.Fail($"{published} is missing: publish it first (tools/publish-cli artifacts/cli; ./test.sh does)");
        }
        var dir = Directory.CreateTempSubdirectory("ublksharp-cli-").FullName;
        var local = Path.Combine(dir, "ublksharp");
        File.Copy(published, local); // with its mode: executable
        return local;
    });

    public static (int ExitCode, string Output) RunCli(string args, TimeSpan? timeout = null) =>
        Run(Cli, args, timeout ?? TimeSpan.FromMinutes(3));

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

    /// <summary>
    /// Runs a program with its arguments as given (no shell, no quoting) and a time bound; returns
    /// stdout and stderr apart. <paramref name="environment"/> adds to (or overrides) this process's.
    /// </summary>
    public static (int ExitCode, string Stdout, string Stderr) Exec(string file, IEnumerable<string> args, TimeSpan timeout,
        IReadOnlyDictionary<string, string>? environment = null)
    {
        var psi = new ProcessStartInfo(file) { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var a in args)
        {
            psi.ArgumentList.Add(a);
        }
        foreach (var (k, v) in environment ?? new Dictionary<string, string>())
        {
            psi.Environment[k] = v;
        }
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(timeout))
        {
            p.Kill(entireProcessTree: true);
            Assert.Fail($"{file} {string.Join(' ', args)} did not finish within {timeout.TotalSeconds} s");
        }
        p.WaitForExit();
        return (p.ExitCode, stdout.Result, stderr.Result);
    }

    /// <summary>`bash -c <paramref name="script"/>` with a time bound (default 2 minutes); exit code and combined output.</summary>
    public static (int ExitCode, string Output) Sh(string script, TimeSpan? timeout = null)
    {
        var (code, stdout, stderr) = Exec("bash", ["-c", script], timeout ?? TimeSpan.FromMinutes(2));
        return (code, stdout + stderr);
    }

    /// <summary>As <see cref="Sh"/>, and the script must exit 0; returns its output.</summary>
    public static string ShOk(string script, TimeSpan? timeout = null)
    {
        var (code, output) = Sh(script, timeout);
        Assert.True(code == 0, $"`{script}` exited {code}:\n{output}");
        return output;
    }

    /// <summary>The ublk devices the kernel has (ADD_DEV to DEL_DEV): the ids under /sys/class/ublk-char.</summary>
    public static uint[] DeviceIds()
    {
        const string dir = "/sys/class/ublk-char";
        return !Directory.Exists(dir) ? [] : [.. Directory.GetFileSystemEntries(dir, "ublkc*")
            .Select(p => uint.TryParse(Path.GetFileName(p).AsSpan("ublkc".Length), out var id) ? id : uint.MaxValue)
            .Where(id => id != uint.MaxValue)
            .Order()];
    }

    /// <summary>The /dev/ublkbN nodes that exist.</summary>
    public static string[] BlockNodes() => [.. Directory.GetFiles("/dev", "ublkb*").Order(StringComparer.Ordinal)];

    /// <summary>
    /// Whether a /proc/PID/cmdline runs the CLI: the native executable (any path named ublksharp,
    /// as published or installed as a tool) or its assembly run by dotnet.
    /// </summary>
    public static bool IsCli(string cmdline)
    {
        var argv = cmdline.Split('\0');
        return Path.GetFileName(argv[0]) == "ublksharp" || argv.Any(a => Path.GetFileName(a) == "UblkSharp.Cli.dll");
    }

    /// <summary>Processes (other than this one) running the CLI: daemons, supervisors, or a CLI command.</summary>
    public static int[] CliProcesses()
    {
        var pids = new List<int>();
        foreach (var dir in Directory.GetDirectories("/proc"))
        {
            if (!int.TryParse(Path.GetFileName(dir), out var pid) || pid == Environment.ProcessId)
            {
                continue;
            }
            try
            {
                if (IsCli(File.ReadAllText(Path.Combine(dir, "cmdline"))))
                {
                    pids.Add(pid);
                }
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                // Gone while we looked.
            }
        }
        return [.. pids];
    }

    public static bool IsMounted(string mountPoint)
        => File.ReadAllLines("/proc/self/mounts").Any(l => l.Split(' ') is [_, var dir, ..] && dir == mountPoint);

    /// <summary>Polls <paramref name="condition"/> until it holds or <paramref name="timeout"/> passes; returns its last value.</summary>
    public static bool WaitFor(Func<bool> condition, TimeSpan timeout)
    {
        var deadline = Environment.TickCount64 + (long)timeout.TotalMilliseconds;
        while (!condition())
        {
            if (Environment.TickCount64 > deadline)
            {
                return condition();
            }
            Thread.Sleep(50);
        }
        return true;
    }

    /// <summary>Writes a line to the running test's output (shown with -showLiveOutput, and in result files).</summary>
    public static void Log(string message) => TestContext.Current.TestOutputHelper?.WriteLine(message);

    /// <summary>A measured figure: goes to the test output and to the console, so that CI's log carries it even when the test passes.</summary>
    public static void Figure(string message)
    {
        Log(message);
        Console.WriteLine("FIGURE " + message);
    }
}
