using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Security.Cryptography;

namespace UblkSharp.VmTests;

/// <summary>What the cow VM tests share: a scratch directory in the guest's /tmp and small helpers.</summary>
public abstract partial class CowVmTest : IDisposable
{
    private readonly string _dir = Path.Combine("/tmp", $"cowvm-{Guid.NewGuid():N}");

    protected CowVmTest()
    {
        Directory.CreateDirectory(_dir);
    }

    public void Dispose()
    {
        Dispose(true);
        GC.SuppressFinalize(this);
    }

    protected virtual void Dispose(bool disposing)
    {
        try
        {
            Directory.Delete(_dir, recursive: true);
        }
        catch (IOException)
        {
        }
    }

    protected string Dir => _dir;

    protected string F(string name) => Path.Combine(_dir, name);

    /// <summary>`bash -c script`, bounded in time; it must exit 0. Returns stdout and stderr.</summary>
    protected static string Sh(string script, int timeoutSeconds = 300)
    {
        var psi = new ProcessStartInfo("bash") { RedirectStandardOutput = true, RedirectStandardError = true };
        psi.ArgumentList.Add("-c");
        psi.ArgumentList.Add(script);
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(TimeSpan.FromSeconds(timeoutSeconds)))
        {
            p.Kill(entireProcessTree: true);
            p.WaitForExit();
            Assert.Fail($"`{script}` did not finish within {timeoutSeconds} s:\n{stdout.Result}{stderr.Result}");
        }
        p.WaitForExit();
        Assert.True(p.ExitCode == 0, $"`{script}` exited {p.ExitCode}:\n{stdout.Result}{stderr.Result}");
        return stdout.Result + stderr.Result;
    }

    /// <summary>`ublksharp add ...`: returns the device id and its block node.</summary>
    protected static (uint Id, string Path) Add(string args)
    {
        var (code, output) = VmEnvironment.RunCli($"add {args}");
        Assert.True(code == 0, $"ublksharp add {args} exited {code}:\n{output}");
        var path = output.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).Last(l => l.StartsWith("/dev/ublkb", StringComparison.Ordinal));
        return (uint.Parse(path["/dev/ublkb".Length..], System.Globalization.CultureInfo.InvariantCulture), path);
    }

    protected static void Del(uint id)
    {
        var (code, output) = VmEnvironment.RunCli($"del -n {id}");
        Assert.True(code == 0, $"ublksharp del -n {id} exited {code}:\n{output}");
    }

    protected string RandomFile(string name, long size, int seed)
    {
        var path = F(name);
        var rng = new Random(seed);
        var buf = new byte[1 << 20];
        using var fs = new FileStream(path, FileMode.CreateNew, FileAccess.Write);
        for (long done = 0; done < size; done += buf.Length)
        {
            rng.NextBytes(buf);
            fs.Write(buf, 0, (int)Math.Min(buf.Length, size - done));
        }
        return path;
    }

    [LibraryImport("libc", SetLastError = true)]
    protected static partial int fsync(int fd);

    protected static string Sha(string path) => Convert.ToHexStringLower(SHA256.HashData(File.ReadAllBytes(path)));

}
