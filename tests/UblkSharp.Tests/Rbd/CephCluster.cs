using System.Diagnostics;
using UblkSharp.Targets;

namespace UblkSharp.Tests.Rbd;

/// <summary>
/// Every RBD test class shares one single-node cluster (tests/ceph/cluster.sh) and runs one at a
/// time: starting a cluster costs about ten seconds, and the fault test stops its OSD.
/// </summary>
[CollectionDefinition(nameof(CephCollection), DisableParallelization = true)]
public class CephCollection : ICollectionFixture<CephCluster>;

/// <summary>
/// A throwaway Ceph cluster on loopback (one monitor, one BlueStore OSD, pool "rbd"). There is no
/// skipping: if it cannot start, every test that uses it fails with the script's reason.
/// </summary>
public sealed class CephCluster : IDisposable
{
    private static int _images;

    public CephCluster()
    {
        Directory = Path.Combine(Path.GetTempPath(), $"ublksharp-ceph-{Environment.ProcessId}-{Guid.NewGuid():N}"[..40]);
        var (code, stdout, stderr) = Run(Script, ["start", Directory], TimeSpan.FromMinutes(3));
        if (code != 0)
        {
            Run(Script, ["stop", Directory], TimeSpan.FromMinutes(1));
            throw new InvalidOperationException($"the test Ceph cluster did not start (tests/ceph/cluster.sh exited {code}):\n{stdout}\n{stderr}");
        }
        StartupLine = stdout.Trim();
        // The start-up time goes to the console, so the CI log carries it.
        Console.WriteLine($"ceph: {StartupLine}");
    }

    public string Directory { get; }

    public string Conf => Path.Combine(Directory, "ceph.conf");

    /// <summary>The script's "cluster up in N s" line.</summary>
    public string StartupLine { get; }

    public static string RepoRoot
    {
        get
        {
            for (var d = new DirectoryInfo(AppContext.BaseDirectory); d is not null; d = d.Parent)
            {
                if (File.Exists(Path.Combine(d.FullName, "UblkSharp.slnx")))
                {
                    return d.FullName;
                }
            }
            throw new InvalidOperationException("UblkSharp.slnx not found above " + AppContext.BaseDirectory);
        }
    }

    public static string Script => Path.Combine(RepoRoot, "tests", "ceph", "cluster.sh");

    public static string CliDll => Path.Combine(RepoRoot, "src", "UblkSharp.Cli", "bin", "Release", "net10.0", "UblkSharp.Cli.dll");

    /// <summary>A new image of <paramref name="size"/> bytes with a name no other test uses.</summary>
    public string CreateImage(long size, string features = "layering,exclusive-lock,object-map,fast-diff")
    {
        var name = $"img{Interlocked.Increment(ref _images)}";
        RbdCli("create", "--size", $"{size >> 20}M", "--image-feature", features, $"rbd/{name}");
        return name;
    }

    /// <summary>Runs the rbd tool against this cluster; it must succeed.</summary>
    public string RbdCli(params string[] args)
    {
        var (code, stdout, stderr) = Run("rbd", ["-c", Conf, .. args], TimeSpan.FromMinutes(1));
        Assert.True(code == 0, $"rbd {string.Join(' ', args)} exited {code}: {stderr}");
        return stdout;
    }

    public RbdTarget Open(string image, bool readOnly = false, string? snapshot = null, int timeoutSeconds = 30, Microsoft.Extensions.Logging.ILoggerFactory? loggerFactory = null)
        => new(new RbdTargetOptions { Pool = "rbd", Image = image, ConfigFile = Conf, ReadOnly = readOnly, Snapshot = snapshot, Timeout = TimeSpan.FromSeconds(timeoutSeconds), LoggerFactory = loggerFactory ?? Microsoft.Extensions.Logging.Abstractions.NullLoggerFactory.Instance });

    public void KillOsd() => ScriptOk("kill-osd");

    public void StartOsd() => ScriptOk("start-osd");

    private void ScriptOk(string command)
    {
        var (code, stdout, stderr) = Run(Script, [command, Directory], TimeSpan.FromMinutes(3));
        Assert.True(code == 0, $"cluster.sh {command} exited {code}: {stdout}{stderr}");
    }

    public static (int Code, string Stdout, string Stderr) Run(string file, IEnumerable<string> args, TimeSpan timeout)
    {
        var psi = new ProcessStartInfo(file) { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var a in args)
        {
            psi.ArgumentList.Add(a);
        }
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(timeout))
        {
            p.Kill(entireProcessTree: true);
            p.WaitForExit();
            return (-1, stdout.Result, $"{file} {string.Join(' ', args)} did not finish within {timeout.TotalSeconds} s\n{stderr.Result}");
        }
        p.WaitForExit();
        return (p.ExitCode, stdout.Result, stderr.Result);
    }

    public void Dispose() => Run(Script, ["stop", Directory], TimeSpan.FromMinutes(1));
}
