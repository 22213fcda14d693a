using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;
using UblkSharp.Cli.Logging;
using UblkSharp.Runtime;
using UblkSharp.Ublk;

namespace UblkSharp.Cli;

/// <summary>
/// `add --supervise`: recovery without a human. The supervisor runs the serving daemon as its
/// child; when the child dies (a crash, kill -9), the kernel holds the device's IO (USER_RECOVERY)
/// and the supervisor starts `recover -n ID`, which takes the device over. A child that exits
/// cleanly (del, SIGTERM) ends the supervisor too. Restarts are bounded so a daemon that cannot
/// start is not retried forever.
/// </summary>
internal static class Supervisor
{
    private const string PidVariable = "UBLKSHARP_SUPERVISOR_PID";
    private const int MaxRestarts = 10;
    private static readonly TimeSpan RestartWindow = TimeSpan.FromMinutes(1);

    /// <summary>The supervisor of this daemon, or 0.</summary>
    public static int ParentSupervisorPid =>
        int.TryParse(Environment.GetEnvironmentVariable(PidVariable), NumberStyles.None, CultureInfo.InvariantCulture, out var pid) ? pid : 0;

    public static int Run(string[] addArgs, string? readyFile)
    {
        using var stop = new ManualResetEventSlim();
        using var term = PosixSignalRegistration.Create(PosixSignal.SIGTERM, c => { c.Cancel = true; stop.Set(); });
        using var intr = PosixSignalRegistration.Create(PosixSignal.SIGINT, c => { c.Cancel = true; stop.Set(); });

        Process child;
        uint id;
        string path;
        try
        {
            (child, id, path) = StartChild(addArgs);
        }
        catch (Exception e) when (CliErrors.IsExpected(e))
        {
            DaemonLauncher.ReportFailure(readyFile, CliErrors.Describe(e));
            throw;
        }
        DaemonLauncher.ReportReady(readyFile, id, path);
        // Restarts are `recover -n ID`: nothing after the first start needs the caller's directory,
        // and a supervisor must not pin a mount (see DaemonHost).
        Directory.SetCurrentDirectory("/");
        return Supervise(child, id, stop);
    }

    /// <summary>
    /// `upgrade` of a supervised device: a new supervisor, whose first child is a warm standby
    /// (`recover --standby --warm-file`, which writes <paramref name="warmFile"/> once warm). The
    /// word on this process's stdin is passed on to it; once it has taken the device over, this
    /// process supervises it as <see cref="Run"/> does. The old daemon's clean exit after its hand-over
    /// ends the old supervisor.
    /// </summary>
    public static int RunTakeover(uint id, string warmFile, string? readyFile)
    {
        using var stop = new ManualResetEventSlim();
        using var term = PosixSignalRegistration.Create(PosixSignal.SIGTERM, c => { c.Cancel = true; stop.Set(); });
        using var intr = PosixSignalRegistration.Create(PosixSignal.SIGINT, c => { c.Cancel = true; stop.Set(); });
        Directory.SetCurrentDirectory("/");
        var idText = id.ToString(CultureInfo.InvariantCulture);
        var childReady = Path.Combine(DeviceRecord.Directory, $"ready-{Guid.NewGuid():N}");
        var psi = DaemonLauncher.SelfStartInfo(["recover", "-n", idText, "--foreground", "--standby", "--warm-file", warmFile, "--ready-file", childReady]);
        psi.RedirectStandardInput = true;
        psi.Environment[PidVariable] = Environment.ProcessId.ToString(CultureInfo.InvariantCulture);
        Process child;
        try
        {
            child = Process.Start(psi) ?? throw new IOException("could not start the new daemon");
        }
        catch (Exception e) when (e is IOException or System.ComponentModel.Win32Exception)
        {
            DaemonLauncher.ReportFailure(readyFile, e.Message);
            return CliErrors.Failure;
        }
        string path;
        try
        {
            if (Console.In.ReadLine() != "go")
            {
                // The upgrade was called off (or its command died): the standby goes away with it.
                child.StandardInput.Close();
                child.WaitForExit();
                child.Dispose();
                return 0;
            }
            child.StandardInput.WriteLine("go");
            child.StandardInput.Flush();
            (_, path) = DaemonLauncher.WaitForReady(child.Id, childReady, null);
        }
        catch (Exception e) when (CliErrors.IsExpected(e))
        {
            DaemonLauncher.ReportFailure(readyFile, CliErrors.Describe(e));
            _ = Interop.Processes.Signal(child.Id, Interop.Processes.SIGKILL);
            child.WaitForExit();
            child.Dispose();
            return CliErrors.Failure;
        }
        DaemonLauncher.ReportReady(readyFile, id, path);
        return Supervise(child, id, stop);
    }

    // Waits on the serving daemon, recovers it when it dies, until it exits cleanly or this process is stopped.
    private static int Supervise(Process child, uint id, ManualResetEventSlim stop)
    {
        var idText = id.ToString(CultureInfo.InvariantCulture);
        var restarts = new Queue<DateTime>();
        // A warm spare cuts the stall after a crash from a cold .NET start to the takeover itself.
        var spare = StartSpare(idText);
        try
        {
            while (true)
            {
                while (!child.WaitForExit(10))
                {
                    if (stop.IsSet)
                    {
                        // Our stop is the daemon's stop: it drains IO, then stops and deletes the device.
                        SystemdNotify.Stopping();
                        _ = Interop.Processes.Signal(child.Id, Interop.Processes.SIGTERM);
                        child.WaitForExit();
                        return 0;
                    }
                }
                var code = child.ExitCode;
                child.Dispose();
                if (code == 0)
                {
                    return 0;
                }
                CliLog.Warning($"supervisor: the daemon of device {id} died (exit {code}); recovering it");
                Process? next = null;
                while (next is null)
                {
                    if (!MayRestart(restarts, id))
                    {
                        return 1;
                    }
                    try
                    {
                        if (spare is not null && !spare.Value.Process.HasExited)
                        {
                            spare.Value.Process.StandardInput.WriteLine("go");
                            spare.Value.Process.StandardInput.Flush();
                            DaemonLauncher.WaitForReady(spare.Value.Process.Id, spare.Value.Ready, null);
                            next = spare.Value.Process;
                        }
                        else
                        {
                            (next, _, _) = StartChild(["recover", "-n", idText]);
                        }
                    }
                    catch (Exception e) when (CliErrors.IsExpected(e))
                    {
                        // A daemon that dies during the takeover (even after the device went live again)
                        // leaves the device quiesced with its IO held: giving up here would hang that IO
                        // for good, so this counts as one more restart and a cold start tries again.
                        CliLog.Error($"supervisor: recovering device {id} failed: {CliErrors.Describe(e)}");
                        spare?.Process.Dispose();
                        spare = null;
                        if (TakenOverByAnother(id) is int other)
                        {
                            // A `recover` by hand won the takeover lock: its daemon serves, not a child of ours.
                            CliLog.Warning($"supervisor: device {id} was taken over by another daemon (pid {other}); it is no longer supervised");
                            return 0;
                        }
                    }
                }
                child = next;
                spare = StartSpare(idText);
            }
        }
        finally
        {
            // Closing its stdin tells a spare to go away.
            spare?.Process.StandardInput.Close();
            spare?.Process.Dispose();
        }
    }

    // Counts a restart; false (with the reason said) when the budget is spent or the device cannot be recovered.
    private static bool MayRestart(Queue<DateTime> restarts, uint id)
    {
        restarts.Enqueue(DateTime.UtcNow);
        while (restarts.Count > 0 && DateTime.UtcNow - restarts.Peek() > RestartWindow)
        {
            restarts.Dequeue();
        }
        if (restarts.Count > MaxRestarts)
        {
            CliLog.Error($"supervisor: {MaxRestarts} restarts within {RestartWindow.TotalSeconds} s; giving up on device {id}");
            return false;
        }
        if (!IsRecoverable(id))
        {
            CliLog.Warning($"supervisor: device {id} is gone or cannot be recovered; exiting");
            return false;
        }
        return true;
    }

    private static (Process Process, string Ready)? StartSpare(string id)
    {
        var ready = Path.Combine(DeviceRecord.Directory, $"ready-{Guid.NewGuid():N}");
        var psi = DaemonLauncher.SelfStartInfo(["recover", "-n", id, "--foreground", "--standby", "--ready-file", ready]);
        psi.RedirectStandardInput = true;
        psi.Environment[PidVariable] = Environment.ProcessId.ToString(CultureInfo.InvariantCulture);
        try
        {
            return (Process.Start(psi) ?? throw new IOException("could not start a spare daemon"), ready);
        }
        catch (Exception e) when (e is IOException or System.ComponentModel.Win32Exception)
        {
            CliLog.Warning($"supervisor: no warm spare ({e.Message}); a crash will start a cold one");
            return null;
        }
    }

    // After our takeover lost: waits out the winner's (bounded), then the pid of the daemon it left serving, if any.
    private static int? TakenOverByAnother(uint id)
    {
        WaitUntil(() => !TakeoverLock.IsHeld(id), TimeSpan.FromMinutes(2));
        try
        {
            using var control = ControlDevice.Open();
            var info = control.GetDeviceInfo(id);
            return (DeviceState)info.state == DeviceState.Live && Interop.Processes.IsAlive(info.ublksrv_pid) ? info.ublksrv_pid : null;
        }
        catch (Interop.ErrnoException)
        {
            return null;
        }
    }

    private static void WaitUntil(Func<bool> done, TimeSpan timeout)
    {
        var deadline = Environment.TickCount64 + (long)timeout.TotalMilliseconds;
        while (!done() && Environment.TickCount64 < deadline)
        {
            Thread.Sleep(50);
        }
    }

    private static bool IsRecoverable(uint id)
    {
        try
        {
            using var control = ControlDevice.Open();
            var info = control.GetDeviceInfo(id);
            // Recoverability's rules, with the daemon taken as dead: it just died.
            return Recoverability.Obstacle((DeviceState)info.state, (UblkFeatures)info.flags, daemonAlive: false) == RecoveryObstacle.None;
        }
        catch (Interop.ErrnoException)
        {
            return false;
        }
    }

    private static (Process Child, uint Id, string Path) StartChild(string[] args)
    {
        var ready = Path.Combine(DeviceRecord.Directory, $"ready-{Guid.NewGuid():N}");
        var psi = DaemonLauncher.SelfStartInfo([.. args, "--foreground", "--ready-file", ready]);
        psi.Environment[PidVariable] = Environment.ProcessId.ToString(CultureInfo.InvariantCulture);
        var child = Process.Start(psi) ?? throw new IOException("could not start the daemon");
        try
        {
            var (id, path) = DaemonLauncher.WaitForReady(child.Id, ready, null);
            return (child, id, path);
        }
        catch
        {
            child.Dispose();
            throw;
        }
    }
}
