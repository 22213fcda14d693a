using System.Diagnostics;
using UblkSharp.Targets.Cow;

namespace UblkSharp.Tests.Cow;

/// <summary>A scratch directory for COW tests, deleted on dispose.</summary>
internal sealed class ScratchDir : IDisposable
{
    public ScratchDir()
    {
        Path = System.IO.Path.Combine(System.IO.Path.GetTempPath(), $"ublksharp-cow-{Guid.NewGuid():N}");
        Directory.CreateDirectory(Path);
    }

    public string Path { get; }

    public string File(string name) => System.IO.Path.Combine(Path, name);

    /// <summary>A file of <paramref name="size"/> seeded random bytes.</summary>
    public string RandomFile(string name, long size, int seed)
    {
        var path = File(name);
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

    public void Dispose()
    {
        try
        {
            Directory.Delete(Path, recursive: true);
        }
        catch (IOException)
        {
        }
    }
}

/// <summary>The UML tools the interop tests use (Debian's user-mode-linux and uml-utilities).</summary>
internal static class Uml
{
    public const string Linux = "/usr/bin/linux.uml";
    public const string MkCow = "/usr/bin/uml_mkcow";
    public const string Moo = "/usr/bin/uml_moo";

    public static void Require(params string[] tools)
    {
        foreach (var t in tools)
        {
            if (!System.IO.File.Exists(t))
            {
                Assert.Fail($"{t} is missing: install Debian's user-mode-linux and uml-utilities (./test.sh does)");
            }
        }
    }

    /// <summary>Runs a program with a time bound; returns its exit code and combined output.</summary>
    public static (int ExitCode, string Output) Run(string file, IEnumerable<string> args, TimeSpan timeout, string? workDir = null)
    {
        var psi = new ProcessStartInfo(file) { RedirectStandardOutput = true, RedirectStandardError = true, RedirectStandardInput = true };
        foreach (var a in args)
        {
            psi.ArgumentList.Add(a);
        }
        if (workDir is not null)
        {
            psi.WorkingDirectory = workDir;
        }
        using var p = Process.Start(psi)!;
        p.StandardInput.Close();
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(timeout))
        {
            p.Kill(entireProcessTree: true);
            p.WaitForExit();
            Assert.Fail($"{file} {string.Join(' ', args)} did not finish within {timeout.TotalSeconds} s; output:\n{stdout.Result}{stderr.Result}");
        }
        return (p.ExitCode, stdout.Result + stderr.Result);
    }

    public static string RunOk(string file, params string[] args)
    {
        var (code, output) = Run(file, args, TimeSpan.FromMinutes(2));
        Assert.True(code == 0, $"{file} {string.Join(' ', args)} exited {code}:\n{output}");
        return output;
    }

    /// <summary>
    /// Boots linux.uml as a plain process with the host's root as a hostfs root (so the guest
    /// sees host paths) and <paramref name="ubd0"/> as ubd0, runs <paramref name="script"/> as init,
    /// which must end with "poweroff -f". Returns the console output.
    /// </summary>
    public static string Boot(ScratchDir dir, string ubd0, string script)
    {
        Require(Linux);
        var init = dir.File($"init-{Guid.NewGuid():N}.sh");
        System.IO.File.WriteAllText(init, "#!/bin/sh\nexport PATH=/usr/sbin:/usr/bin:/sbin:/bin\nmount -t proc proc /proc\n" + script + "\nsync\npoweroff -f\n");
        if (!OperatingSystem.IsWindows())
        {
            System.IO.File.SetUnixFileMode(init, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
        }
        // UML maps its memory from a file under TMPDIR, which must allow exec: the scratch dir does.
        // The console's input must be /dev/null: on a pipe, UML sees its end, hangs up the console and init dies.
        var (code, output) = Run("/bin/sh", ["-c", "exec timeout -k 10 240 \"$@\" </dev/null", "sh", "/usr/bin/env", $"TMPDIR={dir.Path}", Linux, "mem=256M", $"ubd0={ubd0}", "root=/dev/root", "rootfstype=hostfs", "rootflags=/", "rw",
            $"init={init}", "con=null", "con0=fd:0,fd:1"], TimeSpan.FromMinutes(5), dir.Path);
        Assert.True(code == 0, $"linux.uml exited {code}:\n{output}");
        Assert.True(output.Contains("reboot: System halted", StringComparison.Ordinal), $"linux.uml did not halt cleanly:\n{output}");
        return output;
    }
}

/// <summary>Helpers to look at COW files in tests.</summary>
internal static class CowFiles
{
    public static byte[] ReadAll(CowTarget t)
    {
        var data = new byte[t.Size];
        Assert.Equal(data.Length, t.Read(data, 0));
        return data;
    }
}
