using System.Diagnostics;
using UblkSharp.Interop;
using UblkSharp.Runtime;

namespace UblkSharp.Cli;

/// <summary>
/// Starts `ublksharp add ... --foreground` as a detached daemon (its own session, output to a log
/// under /run/ublksharp/logs) and waits until it reports the device live or fails.
/// .NET cannot fork, so the daemon is a fresh process; the report travels through a file.
/// </summary>
internal static class DaemonLauncher
{
    private static readonly TimeSpan ReadyTimeout = TimeSpan.FromMinutes(3);

    public static (uint Id, string Path) Launch(string[] args)
    {
        var runDir = DeviceRecord.Directory;
        var logDir = Path.Combine(runDir, "logs");
        StateDirectory.Ensure(runDir);
        StateDirectory.Ensure(logDir);
        var token = $"{DateTime.UtcNow:yyyyMMdd-HHmmss}-{Guid.NewGuid().ToString("N")[..8]}";
        var ready = Path.Combine(runDir, $"ready-{token}");
        var log = Path.Combine(logDir, $"daemon-{token}.log");

        // The log is for its owner only, as every state file; the shell only appends to it.
        StateDirectory.CreateFile(log);
        var self = SelfStartInfo([.. args, "--foreground", "--ready-file", ready]);
        var psi = new ProcessStartInfo("/bin/sh") { RedirectStandardOutput = true, UseShellExecute = false };
        // setsid: the daemon must outlive this command and its terminal; no stdio is shared with the
        // caller, so `$(ublksharp add ...)` returns as soon as this process does.
        psi.ArgumentList.Add("-c");
        psi.ArgumentList.Add("exec setsid \"$@\" </dev/null >>\"$UBLKSHARP_LOG\" 2>&1 & echo $!");
        psi.ArgumentList.Add("sh");
        psi.ArgumentList.Add(self.FileName);
        foreach (var a in self.ArgumentList)
        {
            psi.ArgumentList.Add(a);
        }
        psi.Environment["UBLKSHARP_LOG"] = log;

        int pid;
        using (var sh = Process.Start(psi) ?? throw new IOException("could not start /bin/sh"))
        {
            var line = sh.StandardOutput.ReadLine();
            sh.WaitForExit();
            if (!int.TryParse(line, out pid))
            {
                throw new IOException("could not start the daemon");
            }
        }
        return WaitForReady(pid, ready, log);
    }

    /// <summary>
    /// A start of this same CLI with <paramref name="args"/>: run by dotnet, the same dll; otherwise
    /// (the apphost, or a native AOT build) the same executable.
    /// </summary>
    public static ProcessStartInfo SelfStartInfo(IEnumerable<string> args) =>
        StartInfo(Path.GetFileNameWithoutExtension(Environment.ProcessPath) == "dotnet"
            ? Path.Combine(AppContext.BaseDirectory, typeof(DaemonLauncher).Assembly.GetName().Name + ".dll")
            : Environment.ProcessPath ?? "dotnet", args);

    /// <summary>
    /// A start of the CLI <paramref name="binary"/> (its UblkSharp.Cli.dll, run by dotnet, or an
    /// executable such as the published apphost) with <paramref name="args"/>.
    /// </summary>
    public static ProcessStartInfo StartInfo(string binary, IEnumerable<string> args)
    {
        var dll = binary.EndsWith(".dll", StringComparison.Ordinal);
        var psi = new ProcessStartInfo(dll ? DotnetHost : binary) { UseShellExecute = false };
        if (dll)
        {
            psi.ArgumentList.Add(binary);
        }
        foreach (var a in args)
        {
            psi.ArgumentList.Add(a);
        }
        return psi;
    }

    private static string DotnetHost => Path.GetFileNameWithoutExtension(Environment.ProcessPath) == "dotnet" ? Environment.ProcessPath! : "dotnet";

    /// <summary>
    /// Starts <paramref name="start"/> detached (its own session, output appended to <paramref name="log"/>)
    /// with its stdin a pipe from this process, which stays open while this process lives; its pid and that pipe.
    /// </summary>
    public static (int Pid, StreamWriter Stdin) StartDetachedWithStdin(ProcessStartInfo start, string log)
    {
        var psi = new ProcessStartInfo("/bin/sh") { RedirectStandardInput = true, RedirectStandardOutput = true, UseShellExecute = false };
        // A background job's stdin would be /dev/null: it gets the pipe through fd 3.
        psi.ArgumentList.Add("-c");
        psi.ArgumentList.Add("exec 3<&0; setsid \"$@\" <&3 3<&- >>\"$UBLKSHARP_LOG\" 2>&1 & echo $!");
        psi.ArgumentList.Add("sh");
        psi.ArgumentList.Add(start.FileName);
        foreach (var a in start.ArgumentList)
        {
            psi.ArgumentList.Add(a);
        }
        psi.Environment["UBLKSHARP_LOG"] = log;
        var sh = Process.Start(psi) ?? throw new IOException("could not start /bin/sh");
        var line = sh.StandardOutput.ReadLine();
        sh.WaitForExit();
        if (!int.TryParse(line, out var pid))
        {
            sh.StandardInput.Close();
            throw new IOException($"could not start {start.FileName}");
        }
        return (pid, sh.StandardInput);
    }

    /// <summary>A new daemon log (owner-only) under the run directory.</summary>
    public static string NewLog(string what)
    {
        var logDir = Path.Combine(DeviceRecord.Directory, "logs");
        StateDirectory.Ensure(DeviceRecord.Directory);
        StateDirectory.Ensure(logDir);
        var log = Path.Combine(logDir, $"{what}-{DateTime.UtcNow:yyyyMMdd-HHmmss}-{Guid.NewGuid().ToString("N")[..8]}.log");
        StateDirectory.CreateFile(log);
        return log;
    }

    /// <summary>The last lines of a daemon's log.</summary>
    public static string LogTail(string log) => Tail(log);

    /// <summary>Waits until the daemon <paramref name="pid"/> writes its report to <paramref name="ready"/>, dies, or times out.</summary>
    public static (uint Id, string Path) WaitForReady(int pid, string ready, string? log)
    {
        var deadline = Stopwatch.StartNew();
        while (true)
        {
            if (File.Exists(ready))
            {
                var report = File.ReadAllText(ready).Trim();
                File.Delete(ready);
                var parts = report.Split(' ', 3);
                if (parts[0] == "ok" && parts.Length == 3 && uint.TryParse(parts[1], out var id))
                {
                    return (id, parts[2]);
                }
                throw new DaemonFailedException(report.StartsWith("error ", StringComparison.Ordinal) ? report[6..] : report);
            }
            if (!Processes.IsAlive(pid) || IsZombie(pid))
            {
                throw new DaemonFailedException(log is null
                    ? "the daemon exited before the device was live"
                    : $"the daemon exited before the device was live; its log ({log}) ends:\n{Tail(log)}");
            }
            if (deadline.Elapsed > ReadyTimeout)
            {
                Processes.Signal(pid, Processes.SIGKILL);
                throw new DaemonFailedException($"the device was not live within {ReadyTimeout.TotalSeconds} s; the daemon was killed{(log is null ? "" : $". Log: {log}")}");
            }
            Thread.Sleep(20);
        }
    }

    // A child of ours that exited stays a zombie until reaped, and kill(pid, 0) still succeeds.
    private static bool IsZombie(int pid)
    {
        try
        {
            var stat = File.ReadAllText($"/proc/{pid}/stat");
            var close = stat.LastIndexOf(')');
            return close > 0 && close + 2 < stat.Length && stat[close + 2] == 'Z';
        }
        catch (IOException)
        {
            return false;
        }
    }

    /// <summary>The device serves IO: told to whoever waits (a ready file, or systemd through NOTIFY_SOCKET).</summary>
    public static void ReportReady(string? readyFile, uint id, string path)
    {
        Write(readyFile, $"ok {id} {path}");
        SystemdNotify.Ready(path);
    }

    public static void ReportFailure(string? readyFile, string message) => Write(readyFile, $"error {message}");

    private static void Write(string? readyFile, string text)
    {
        if (readyFile is null)
        {
            return;
        }
        StateDirectory.WriteAtomically(readyFile, text);
    }

    private static string Tail(string log)
    {
        try
        {
            return string.Join('\n', File.ReadLines(log).TakeLast(10));
        }
        catch (IOException)
        {
            return "(no log)";
        }
    }
}

/// <summary>The daemon reported a failure (already phrased for the user).</summary>
internal sealed class DaemonFailedException(string message) : Exception(message);
